"""What `all`, `leaderboard` and `report` show from finished runs: they read runs/ and submissions/ only.

- `leaderboard`: every experiment and ensemble ranked by CV (reports/leaderboard.{csv,md}), `compare`.
- `experiment_page`: reports/<exp>/ with its pictures.
- `score_table`: the table `./run.sh all` prints last.
"""
