"""`masknet bench`: training/prediction throughput, latency, memory and roofline fractions.

    flops.py   FLOPs per sample of a model (forward, forward + backward), counted from its architecture
    matmul.py  the machine's fp32 / bf16 GEMM throughput at the model's own matmul shapes
    runner.py  per model x precision measurements (each in its own process), the table and the JSON

Method and results: docs/performance.md.
"""
