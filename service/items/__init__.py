"""Items: the service's first resource."""
