"""The report: notebooks executed and exported, their charts, and how results are shown."""
