"""Paper baselines: each file is a standalone script (`python baselines/sac.py --help`)."""
