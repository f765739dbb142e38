"""Process groups and launcher environments: env.py (who is this rank), dist.py (join the group),
topology.py (SP x DP groups, the mpu for DeepSpeed), attention.py (Ulysses attention core),
shard.py (cutting token sequences across an SP group and putting outputs back together)."""
