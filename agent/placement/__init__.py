"""Placement: cluster meters and site terminals at graph medoids (paper, section 2.1)."""
