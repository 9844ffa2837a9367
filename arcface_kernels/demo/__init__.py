"""A two-minute demo: train embeddings on scikit-learn's digits with four margin heads
(`python -m arcface_kernels.demo`) and compare closed-set accuracy and open-set verification."""
