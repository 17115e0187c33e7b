"""Autotuning: a model's kernels tuned with MetaSchedule (XGBoost cost model) into
``tuning_logs/<family>/``; ``tvm_rbn.build`` applies the records when it builds.

    records.py  the tuning-log folder of a target family: location, validation, atomic publish
    tasks.py    which kernels are tuned, their MetaSchedule workload, their weight in a step
    tune.py     the tuning loop: budget in trials and seconds, progress, resumable
    worker.py   functions MetaSchedule's builder and runner workers load by name
"""
