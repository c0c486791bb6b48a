"""Pretraining speed of the domain transformer: parameter counts per preset, tokens/s, and MFU on GPU.

Run: `.venv/bin/python benchmarks/bench_pretrain.py [--presets tiny,24m] [--steps 3] [--vocab-size N]`.
On CPU it measures tokens/s for a few AdamW steps at each of `--cpu-threads` (e.g. 1,2), and the training FLOP/s
against a large fp32 matmul timed on the same threads (the machine's practical peak); with CUDA it uses bf16
autocast + SDPA (flash) + torch.compile and prints model FLOPs utilization (MFU) against the GPU's dense bf16 peak.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import domaintok  # noqa: F401  (registers the Auto classes)
from domaintok.models import PRESETS, DomainTransformerConfig, DomainTransformerForCausalLM

# Dense bf16 peak TFLOP/s (no sparsity) by device-name fragment, for MFU.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0}
# Vocabulary sizes to report parameter counts for: the Online Retail tokenizer and a larger multi-field domain.
COUNT_VOCABS = (20_000,)


def count_parameters(preset: str, vocab_size: int) -> tuple[int, int]:
    """(all parameters with the tied embedding counted once, non-embedding parameters) without allocating."""
    with torch.device("meta"):
        model = DomainTransformerForCausalLM(DomainTransformerConfig.from_preset(preset, vocab_size=vocab_size))
    total = sum(p.numel() for p in model.parameters())
    return total, total - model.model.embed_tokens.weight.numel()


def flops_per_token(config: DomainTransformerConfig, non_embedding: int, context: int) -> float:
    """Training FLOPs per token: 6 x (matmul parameters incl. the tied LM head) + attention scores (PaLM B.1).

    Forward is 2 FLOPs per multiply-add, backward twice that; the attention term counts QK^T and AV:
    12 * layers * hidden * context (6 x 2 x L x H x T), halved-causal savings not claimed.
    """
    matmul_params = non_embedding + config.vocab_size * config.hidden_size
    return 6.0 * matmul_params + 12.0 * config.num_hidden_layers * config.hidden_size * context


def peak_tflops(device_name: str) -> float | None:
    for fragment, tflops in PEAK_BF16_TFLOPS.items():
        if fragment in device_name:
            return tflops
    return None


def matmul_peak_gflops(threads: int, size: int = 2048, repeats: int = 5) -> float:
    """fp32 GFLOP/s of a size x size matmul on `threads` CPU threads: the best of `repeats` timings."""
    torch.set_num_threads(threads)
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best / 1e9


def measure(preset: str, vocab_size: int, batch_size: int, context: int, steps: int, device: torch.device,
            compile_model: bool) -> dict:
    torch.manual_seed(0)
    config = DomainTransformerConfig.from_preset(preset, vocab_size=vocab_size, dropout=0.0,
                                                 max_position_embeddings=context)
    model = DomainTransformerForCausalLM(config).to(device).train()
    _, non_embedding = count_parameters(preset, vocab_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=device.type == "cuda")
    step_fn = torch.compile(model) if compile_model else model
    input_ids = torch.randint(5, vocab_size, (batch_size, context), device=device)  # (B, T), no padding
    cuda = device.type == "cuda"

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss = step_fn(input_ids, labels=input_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up: allocator, kernels, compilation
    if cuda:
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    tokens_per_second = steps * batch_size * context / seconds
    result = {
        "preset": preset, "device": str(device), "batch_size": batch_size, "context": context, "steps": steps,
        "tokens_per_second": round(tokens_per_second, 1), "seconds_per_step": round(seconds / steps, 3),
        "flops_per_token": flops_per_token(config, non_embedding, context),
    }
    if cuda:
        name = torch.cuda.get_device_name()
        peak = peak_tflops(name)
        achieved = tokens_per_second * result["flops_per_token"] / 1e12
        result.update(device_name=name, achieved_tflops=round(achieved, 1),
                      mfu=round(achieved / peak, 4) if peak else None, compiled=compile_model)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="tiny,24m")
    parser.add_argument("--vocab-size", type=int, default=2_048, help="vocabulary for the speed runs")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile on GPU")
    parser.add_argument("--cpu-threads", default=None,
                        help="CPU only: thread counts to compare, e.g. 1,2 (default: torch's current count)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="CPU only: repeat the whole comparison, interleaved (a busy machine drifts)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    print("parameters per preset (tied embedding counted once):")
    counts = {}
    for vocab in sorted({args.vocab_size, *COUNT_VOCABS}):
        for preset in PRESETS:
            total, non_embedding = count_parameters(preset, vocab)
            counts[f"{preset}@{vocab}"] = {"parameters": total, "non_embedding": non_embedding}
            print(f"  {preset:>5} vocab {vocab:>6,}: {total:>13,} total, {non_embedding:>13,} non-embedding")

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        print(f"device: {torch.cuda.get_device_name()} (bf16 autocast, SDPA, torch.compile={not args.no_compile})")
    else:
        print(f"device: CPU, {torch.get_num_threads()} threads, fp32 eager. no GPU: MFU not measured")
    results = []
    thread_counts = [None] if cuda or not args.cpu_threads else [int(t) for t in args.cpu_threads.split(",")]
    for round_ in range(args.rounds if not cuda else 1):
        for threads in thread_counts:
            peak = matmul_peak_gflops(threads) if threads else None
            if threads:
                print(f"round {round_ + 1}, {threads} thread(s): fp32 matmul 2048^3 {peak:,.1f} GFLOP/s")
            for preset in args.presets.split(","):
                r = measure(preset, args.vocab_size, args.batch_size, args.context, args.steps, device,
                            compile_model=cuda and not args.no_compile)
                line = (f"  {preset:>5}: {r['tokens_per_second']:>10,.0f} tokens/s ({r['seconds_per_step']:.3f} s/step, "
                        f"batch {r['batch_size']} x {r['context']} tokens, {r['flops_per_token'] / 1e6:,.2f} MFLOP/token)")
                if threads:
                    achieved = r["tokens_per_second"] * r["flops_per_token"] / 1e9
                    r.update(threads=threads, round=round_ + 1, achieved_gflops=round(achieved, 2),
                             matmul_peak_gflops=round(peak, 1), peak_ratio=round(achieved / peak, 4))
                    line += f", {achieved:,.2f} GFLOP/s = {achieved / peak:.1%} of the matmul peak"
                if cuda:
                    mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "unknown peak"
                    line += f", {r['achieved_tflops']} TFLOP/s, MFU {mfu}"
                results.append(r)
                print(line)
    if not cuda:
        print("no GPU: MFU not measured (run on a CUDA machine for bf16 + flash SDPA + torch.compile numbers)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"parameters": counts, "speed": results}, fh, indent=2)


if __name__ == "__main__":
    main()
