"""Tools beside the toolkit (checkpoint converters), outside the adapter registry's import path.

Nothing in tokenprune imports these eagerly: each loads when its command or function is used.
"""
