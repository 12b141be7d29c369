"""Disc-embedding throughput (volumes per second): the same disc volumes through ResNet18 one
volume per forward pass (batching off) and many per pass (batching on), in one run.

    python benchmarks/bench_embeddings.py --volumes 48 --batch 16
"""

from __future__ import annotations

import argparse
import logging
import time

import numpy as np
import torch

from ray_app.imaging.embeddings import DiscEmbedder

log = logging.getLogger("bench_embeddings")


def volumes_per_second(embedder: DiscEmbedder, volumes: np.ndarray) -> tuple[float, np.ndarray]:
    embedder.embed(volumes[:1])  # warm-up
    started = time.perf_counter()
    vectors = embedder.embed(volumes)
    return len(volumes) / (time.perf_counter() - started), vectors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--volumes", type=int, default=48, help="disc volumes to embed")
    parser.add_argument("--batch", type=int, default=16, help="volumes per pass when batching")
    parser.add_argument("--shape", type=int, nargs=3, default=(9, 112, 224), help="slices height width")
    parser.add_argument("--weights", help="ResNet18 state dict (random weights otherwise: same cost)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    volumes = np.random.default_rng(0).normal(500, 150, (args.volumes, *args.shape)).astype(np.float32)
    results = {}
    for label, batch in (("batching off", 1), (f"batching on ({args.batch})", args.batch)):
        embedder = DiscEmbedder(args.weights, allow_random=True, device=args.device, batch_volumes=batch)
        results[label] = volumes_per_second(embedder, volumes)
    device = embedder.device
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{args.volumes} volumes of {tuple(args.shape)} -> 512, ResNet18 at 224x224, {name}")
    for label, (rate, _) in results.items():
        print(f"  {label:22s} {rate:7.2f} volumes/s  ({rate * args.shape[0]:7.1f} slices/s)")
    off, on = (r[1] for r in results.values())
    print(f"  max |difference| between the two: {np.abs(off - on).max():.2e}")


if __name__ == "__main__":
    main()
