"""Model importers: each turns a source model into an ir.Graph of primitive ops with static shapes."""
