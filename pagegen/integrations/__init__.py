"""Adapters that make pagegen the attention of other engines. Each imports its engine lazily, so
`import pagegen` never needs them installed."""
