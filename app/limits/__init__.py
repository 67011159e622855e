"""Policy and limits: which model and upstream serve a call (policy), and per-key, per-feature and per-user
limits: requests and tokens per minute, USD per day and month."""

from app.limits.budgets import (
    Budget,
    BudgetLedger,
    InProcessBudgetLedger,
    OverBudget,
    RedisBudgetLedger,
    Reservation,
)
from app.limits.ratelimit import (
    Denied,
    InProcessRateLimiter,
    Limit,
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
    "Limit",
    "OverBudget",
    "RateLimiter",
    "RedisBudgetLedger",
    "RedisRateLimiter",
    "RedisUnavailable",
    "Reservation",
    "redis_client",
]
