"""Fixtures for data and fitted artifacts shared across the suite (real Online Retail data, fitted tokenizers)."""
