"""The central manager: WindowService servicer, window catalog, chunk store tiers."""
