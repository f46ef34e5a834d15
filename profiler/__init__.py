"""rkvsim.profiler (`rkvprof`): per-operator timing profiles and the tables that hold them.

collect: time kernels/ attention per method, compression steps and dense operators on this
device (collect.py); import-vidur: convert Vidur CSVs (vidur_import.py); read a profile back
with a hardware/model check (profile.load_profile). Table schemas: schema.py.
"""
