"""A FastAPI + SQLAlchemy service with a request-scoped database session."""
