"""Policy and limits: which model and upstream serve a call (policy), and per-key, per-feature and per-user
limits: requests and tokens per minute, USD per day and month."""

from app.limits.budgets import (
    Budget,
    BudgetLedger,
    InProcessBudgetLedger,
    OverBudget,
    RedisBudgetLedger,
)
from app.limits.ratelimit import (
    Denied,
    InProcessRateLimiter,
    RateLimiter,
    RedisRateLimiter,
)
from app.limits.redis_guard import RedisUnavailable, redis_client

__all__ = [
    "Budget",
    "BudgetLedger",
    "Denied",
    "InProcessBudgetLedger",
    "InProcessRateLimiter",
    "OverBudget",
    "RateLimiter",
    "RedisBudgetLedger",
    "RedisRateLimiter",
    "RedisUnavailable",
    "redis_client",
]
