"""Tools over the stages' files: leaderboard, compare, experiment pages, the score table, selfcheck,
the demo competition. A tool may use the core; it reads stages only through their files on disk."""
