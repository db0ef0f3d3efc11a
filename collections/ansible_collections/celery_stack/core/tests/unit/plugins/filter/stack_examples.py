"""The example inventory groups and routing table the filter tests share (not a test module)."""

GROUPS = {
    "all": ["mq1", "mq2", "redis1", "w1", "w2"],
    "rabbitmq": ["mq1", "mq2"],
    "redis": ["redis1"],
    "celery_workers": ["w1", "w2"],
    "cpu_workers": ["w1"],
}
POOL_DEFAULTS = {
    "prefork": {"concurrency": 4, "max_tasks_per_child": 1000, "max_memory_per_child": 0,
                "time_limit": 1500, "soft_time_limit": 1440},
    "threads": {"concurrency": 8},
}
TABLE = [
    {"name": "io", "tasks": ["app.tasks.crawl*"], "pools": {"threads": {"concurrency": 32}}},
    {"name": "cpu", "tasks": ["app.tasks.parse", "app.tasks.cpu_*"], "queue_type": "classic",
     "pools": {"prefork": {"concurrency": 2, "time_limit": 300, "soft_time_limit": 240},
               "threads": {"enabled": False}}},
]
