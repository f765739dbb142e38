"""Process groups and launcher environments: env.py (who is this rank, which GPU), dist.py (join the group),
comm.py (every collective, on the device its backend takes), topology.py (SP x DP groups, the mpu for
DeepSpeed), attention.py (Ulysses attention core), shard.py (cutting token sequences across an SP group and
putting outputs back together)."""
