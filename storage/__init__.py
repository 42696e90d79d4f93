"""On-disk formats: the DuckDB analytics database and the SQLite operational state store."""
