"""One training step of the real model on this machine in fp32, fp32 channels-last and bf16.

Why `precision: auto` picks what it picks and why training is channels-last everywhere: a
step (forward, loss, backward, AdamW) of MobileNetV2 with the seed head on a batch of
best.yaml's crops, in each memory format and precision that `Runtime` can choose. The modes
take turns, so drift of a shared machine hits all alike; the first step of each is warm-up.

    python bench/train_step.py                          # batch 32 of 384-px crops, 3 rounds
    python bench/train_step.py --size 224 --rounds 5
    python bench/train_step.py --freeze 0 4             # also with the first 4 stages frozen
    python bench/train_step.py --modes fp32 "fp32 + channels-last"   # skip emulated bf16 (AVX2)
    python bench/train_step.py --compile                # also each mode through torch.compile
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from realfake.config import TrainConfig
from realfake.models import build_model
from realfake.train import cpu_has_bf16, make_optimizer

MODES = {  # name: (memory format, autocast dtype)
    "fp32": (torch.contiguous_format, None),
    "fp32 + channels-last": (torch.channels_last, None),
    "bf16 + channels-last": (torch.channels_last, torch.bfloat16),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=384)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--freeze", type=int, nargs="+", default=[0],
                        help="numbers of leading backbone stages kept frozen, each timed in every mode")
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES),
                        help="the modes to time (emulated bf16 on an AVX2 CPU takes minutes a step)")
    parser.add_argument("--compile", action="store_true",
                        help="also time each setup through torch.compile (`compile: true`); compiling is warm-up")
    args = parser.parse_args()

    torch.manual_seed(0)
    images = torch.randn(args.batch_size, 3, args.size, args.size)
    targets = torch.randint(0, 2, (args.batch_size,))
    setups = {}
    for freeze in args.freeze:
        for mode in args.modes:
            memory_format, dtype = MODES[mode]
            # AdamW's own default weight decay, as this bench has always timed it
            config = TrainConfig(backbone="mobilenet_v2", weights="none", freeze=freeze,
                                 optimizer="adamw", lr=1e-4, weight_decay=0.01)
            model = build_model(config).to(memory_format=memory_format)
            optimizer = make_optimizer(model, config)  # the frozen stages' weights left out, as training does
            name = mode if freeze == 0 else f"{mode}, freeze {freeze}"
            batch = images.contiguous(memory_format=memory_format)
            setups[name] = (model, optimizer, batch, dtype)
            if args.compile:  # the compiled module shares the parameters, as training's does
                setups[f"{name}, compiled"] = (torch.compile(model), optimizer, batch, dtype)

    def step(name: str) -> float:
        model, optimizer, batch, dtype = setups[name]
        started = time.perf_counter()
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            loss = torch.nn.functional.cross_entropy(model(batch), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return time.perf_counter() - started

    times = {name: [] for name in setups}
    for round_ in range(args.rounds + 1):
        for name in setups:
            seconds = step(name)
            if round_:  # the first round warms each mode up
                times[name].append(seconds)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, native bf16: {'yes' if cpu_has_bf16() else 'no'}")
    print(f"MobileNetV2 + seed head, batch {args.batch_size} of {args.size} px, median of {args.rounds} steps")
    base_name = next(iter(times))
    base = statistics.median(times[base_name])
    width = max(32, *map(len, times))
    for name, seconds in times.items():
        median = statistics.median(seconds)
        print(f"  {name:{width}s} {median:6.2f} s/step   {base / median:5.2f}x {base_name}")


if __name__ == "__main__":
    main()
