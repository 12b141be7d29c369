"""Packed rows: a shared prefix and its suffixes in one row, kept apart by the attention mask."""

import torch

from ray_app.engines.tensors import pack_rows, packed_attention_mask

PAD = 0


def test_each_suffix_ends_at_its_slots_column_and_continues_its_prefix():
    prefixes = [[1, 2, 3], [4]]
    suffixes = [[[5, 6], [7]], [[8], [9, 10, 11], [12]]]
    rows = pack_rows(prefixes, suffixes, PAD, "cpu")
    # prefix width 3, slots as wide as their longest suffix: 2, 3, 1
    assert rows.ids.tolist() == [[1, 2, 3, 5, 6, PAD, PAD, 7, PAD],
                                 [PAD, PAD, 4, PAD, 8, 9, 10, 11, 12]]
    assert rows.ends.tolist() == [4, 7, 8]
    assert rows.segments.tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 3]
    real = rows.real.tolist()
    # positions of real tokens: the prefix from 0, each suffix from the prefix's end
    assert [p for p, r in zip(rows.positions[0].tolist(), real[0]) if r] == [0, 1, 2, 3, 4, 3]
    assert [p for p, r in zip(rows.positions[1].tolist(), real[1]) if r] == [0, 1, 1, 2, 3, 1]


def test_a_suffix_sees_the_cached_part_its_prefix_and_itself_only():
    rows = pack_rows([[1, 2], [3]], [[[4, 5], [6]], [[7], [8]]], PAD, "cpu")
    mask = packed_attention_mask(rows, cached=2, dtype=torch.float32)
    assert mask.shape == (2, 1, 5, 7)
    seen = (mask[:, 0] == 0).int().tolist()
    # row 0: columns [cache, cache, 1, 2, 4, 5, 6]; query rows 1, 2, 4, 5, 6
    assert seen[0] == [[1, 1, 1, 0, 0, 0, 0],
                       [1, 1, 1, 1, 0, 0, 0],
                       [1, 1, 1, 1, 1, 0, 0],
                       [1, 1, 1, 1, 1, 1, 0],
                       [1, 1, 1, 1, 0, 0, 1]]  # 6 sees the prefix, not the other suffix
    # row 1: columns [cache, cache, PAD, 3, PAD, 7, 8]; padding sees the cache and itself
    assert seen[1] == [[1, 1, 1, 0, 0, 0, 0],
                       [1, 1, 0, 1, 0, 0, 0],
                       [1, 1, 0, 0, 1, 0, 0],
                       [1, 1, 0, 1, 0, 1, 0],
                       [1, 1, 0, 1, 0, 0, 1]]
