"""The embedded default (README's first command) on a tiny model instead of Qwen."""

import pandas as pd
import pytest

from ray_app.engines import EngineConfig
from ray_app.pipeline.embedded_default import (
    SAMPLE_CONDITIONS,
    run_embedded_default,
    sample_file,
)

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True)
    yield
    ray.shutdown()


def test_sample_data_is_complete():
    reports = pd.read_csv(sample_file("spine_reports.csv"), dtype=str)
    answers = pd.read_csv(sample_file("spine_answers.csv"), dtype=str)
    assert set(reports["split"]) == {"calibration", "label"}
    assert set(answers["condition"]) == set(SAMPLE_CONDITIONS)
    assert set(answers["report_id"]) == set(reports["report_id"])


def test_embedded_default_labels_calibrates_and_prints(local_ray, tiny_model_dir, tmp_path, capsys):
    table = run_embedded_default(str(tmp_path), EngineConfig(model=str(tiny_model_dir)))
    printed = capsys.readouterr().out
    assert (tmp_path / "calibration.json").is_file()
    label_ids = set(pd.read_csv(sample_file("spine_reports.csv")).query("split == 'label'")["report_id"])
    assert set(table["report_id"]) == label_ids
    # 4 conditions, stenosis with 5 levels as well: 9 questions per report
    assert len(table) == 9 * len(label_ids)
    assert table["predicted"].notna().any()
    assert "Calibrated labels vs known answers" in printed and "spinal_cancer" in printed


def test_bf16_only_where_the_cpu_has_it(tmp_path):
    """bf16 is emulated (several times slower than fp32) on a CPU without bf16 instructions."""
    import torch

    from ray_app.engines.devices import native_bf16

    if torch.cuda.is_available():
        pytest.skip("a GPU always takes bf16")
    avx2 = tmp_path / "avx2"
    avx2.write_text("flags\t\t: fpu sse2 avx avx2 fma\n" * 2)
    sapphire = tmp_path / "amx"
    sapphire.write_text("flags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n")
    assert not native_bf16(str(avx2))
    assert native_bf16(str(sapphire))
    assert not native_bf16(str(tmp_path / "missing"))
