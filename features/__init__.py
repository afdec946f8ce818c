"""Frozen-encoder and eGeMAPS feature extraction into HDF5 stores, and the store reader."""
