from tests.control.redis_helpers import redis_prefix, redis_url, throwaway_redis

__all__ = ["redis_prefix", "redis_url", "throwaway_redis"]
