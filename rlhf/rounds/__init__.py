"""Iterative RLHF (`rlhf rounds`): rounds of sampling the policy, labelling, reward update and RL."""
