"""The decode path applied from outside the network: `fast_generate.py` runs `generate()`'s token loop on the device."""
