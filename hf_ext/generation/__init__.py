"""Generation and serving strategies: SART and TIE."""
