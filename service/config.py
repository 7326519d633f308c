"""Every setting of the service, read from the environment and `.env`."""

from functools import lru_cache
from typing import Any

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

DEFAULT_DATABASE_URL = "sqlite:///./service.db"


class Settings(BaseSettings):
    """Configuration; each field is read from the upper-case environment variable of its name."""

    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore")

    database_url: str = Field(
        DEFAULT_DATABASE_URL,
        description="SQLAlchemy URL, e.g. postgresql+psycopg2://user:pass@host:5432/dbname",
    )
    db_pool_size: int = Field(10, ge=1, description="Connections kept open in the pool.")
    db_max_overflow: int = Field(30, ge=0, description="Extra connections opened under load.")
    db_pool_timeout: float = Field(10.0, gt=0, description="Seconds to wait for a connection.")
    db_pool_pre_ping: bool = Field(True, description="Test a pooled connection before using it.")
    db_echo: bool = Field(False, description="Log every SQL statement.")
    db_server_timing: bool = Field(True, description="Send the Server-Timing header.")
    log_level: str = Field("INFO", description="Python logging level name.")
    cursor_secret: SecretStr = Field(
        SecretStr("dev-only-cursor-secret"),
        description="Key that signs the scroll cursors handed to clients, so a cursor that "
        "was altered is refused. Set your own in production; every worker must share it.",
    )

    @field_validator("database_url")
    @classmethod
    def _parsable_url(cls, value: str) -> str:
        try:
            make_url(value)
        except ArgumentError:
            raise ValueError(
                "DATABASE_URL is not a valid SQLAlchemy URL; expected e.g. "
                "'sqlite:///./service.db' or "
                "'postgresql+psycopg2://user:password@localhost:5432/service'"
            ) from None
        return value

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        level = value.upper()
        if level not in {"CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG"}:
            raise ValueError("LOG_LEVEL must be one of CRITICAL, ERROR, WARNING, INFO, DEBUG")
        return level

    def engine_args(self) -> dict[str, Any]:
        """Keyword arguments for `service.db.create_engine` (which drops the pool sizes where
        the backend has no pool, as for in-memory SQLite)."""
        return {
            "echo": self.db_echo,
            "pool_pre_ping": self.db_pool_pre_ping,
            "pool_size": self.db_pool_size,
            "max_overflow": self.db_max_overflow,
            "pool_timeout": self.db_pool_timeout,
        }


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings, read once."""
    return Settings()
