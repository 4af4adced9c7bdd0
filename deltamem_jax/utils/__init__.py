"""Small helpers every room may use: logical sharding names, atomic writes, file errors."""
