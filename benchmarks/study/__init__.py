"""The comparison study of issue 7: federated ST-RPNet vs centralised, local-only and non-deep-learning baselines on a
held-out synthetic test site. Run ``python benchmarks/study/run_study.py --config smoke|full --out DIR``."""
