"""The connections one gpuq process holds, built from Settings at the call site.

Each is imported where it is first opened: a command that reads the database never loads
redis-py or Celery, and one that only talks to Redis never loads SQLAlchemy."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import cached_property
from typing import TYPE_CHECKING, Any

from app.core.errors import BrokerUnavailable
from app.core.paths import private_home
from app.core.sentinel import SentinelUrl
from app.core.settings import Settings, mask_url
from app.store.embedded_redis import resolve_redis_url

if TYPE_CHECKING:
    import redis
    from celery import Celery
    from sqlalchemy import Engine
    from sqlmodel import Session


# About 30 s of reconnecting (backoff doubling from 50 ms up to 2 s) before a call fails.
REDIS_RETRIES = 20


class Runtime:
    """Lazily opened database engine, Redis client and Celery app of one process."""

    def __init__(self, settings: Settings, wait_for_broker: bool = False) -> None:
        """`wait_for_broker`: servers ride out a broker that is away from the first contact
        on; a command (the default) says at once that it is away."""
        self.settings = settings
        self.wait_for_broker = wait_for_broker
        private_home(settings.home)

    @cached_property
    def redis_url(self) -> str:
        return resolve_redis_url(self.settings)

    @cached_property
    def redis(self) -> redis.Redis:
        import redis  # here: commands that only read the database never load it
        from redis.backoff import ExponentialBackoff, NoBackoff
        from redis.retry import Retry

        options: dict[str, Any] = {"socket_connect_timeout": 2, "health_check_interval": 30}
        sentinel = SentinelUrl.parse(self.redis_url)
        client = (sentinel.client(**options) if sentinel is not None
                  else redis.Redis.from_url(self.redis_url, **options))
        riding_out = Retry(ExponentialBackoff(cap=2.0, base=0.05), retries=REDIS_RETRIES)
        try:
            # A command's first contact fails fast, so that it says at once that Redis is
            # away; after that, calls ride out a restart or a short outage of the broker.
            client.set_retry(riding_out if self.wait_for_broker else Retry(NoBackoff(), 0))
            client.ping()
            client.set_retry(riding_out)
        except redis.AuthenticationError as e:
            raise BrokerUnavailable(
                f"Redis at {mask_url(self.redis_url)} refused gpuq: {e}; put its password in "
                "GPUQ_REDIS_URL (redis://:PASSWORD@host:port/db)"
            ) from e
        except (redis.RedisError, OSError) as e:
            raise BrokerUnavailable(
                f"cannot reach Redis at {mask_url(self.redis_url)}: {e}; start it (`gpuq up`) "
                "or fix GPUQ_REDIS_URL"
            ) from e
        return client

    def check_broker(self) -> None:
        """Raise BrokerUnavailable, naming the fix, unless Redis answers."""
        self.redis.ping()

    def check_database(self) -> None:
        """Open the database now (an empty one gets its tables); raise DatabaseUnavailable,
        or SchemaOutdated/SchemaTooNew, naming the fix, unless gpuq can use it."""
        _ = self.engine

    @cached_property
    def engine(self) -> Engine:
        from app.store.db import make_engine

        return make_engine(self.settings)

    @cached_property
    def celery(self) -> Celery:
        from app.celery_app import create_celery

        return create_celery(self.settings, self.redis_url)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session that commits on success and rolls back on error."""
        from sqlmodel import Session

        with Session(self.engine, expire_on_commit=False) as session:
            try:
                yield session
                session.commit()
            except BaseException:
                session.rollback()
                raise

    def close(self) -> None:
        if "engine" in self.__dict__:
            self.engine.dispose()
        if "redis" in self.__dict__:
            self.redis.close()
