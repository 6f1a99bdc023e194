"""Event-driven LLM serving / rollout simulator shared by TIE, SART, PBKV and rollout shaping (issue #4).

This package is a home for the component; it exports nothing until the component is built.
"""
