"""The one GPU check (scripts/bench_gpu.py): environment, a correctness gate through train_c4.py, memory
against the CPU accounting and the planner, interleaved step times, the largest micro-batch and a profile,
each section under its own time budget and written out as it finishes (report.py)."""
