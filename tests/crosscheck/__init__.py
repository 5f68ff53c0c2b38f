"""Helpers for the cross-checks against PyTorch reference implementations (Zennit, LXT)."""
