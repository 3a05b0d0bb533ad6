"""Canonical form: an `Adapter` in, the rank components (uᵢ, σᵢ, vᵢ) of every module's ΔW out (docs/design.md §2)."""
