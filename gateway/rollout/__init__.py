"""Progressive rollout of a candidate tier: shadow copies compared with the primary's answers,
a sticky canary share, guards that advance or roll back, the operator's routes."""
