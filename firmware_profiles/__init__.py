"""Device hardware profiles as TOML data, with their loader and schema."""
