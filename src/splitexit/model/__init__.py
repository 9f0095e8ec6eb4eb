"""Everything about models that is independent of networks: graphs, exits, training, packages."""
