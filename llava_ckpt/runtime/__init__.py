"""Running a tensor-parallel output as real ranks under msrun.

  msrun.py  the launcher: jobs in, rank 0's results out as they finish, every process of the run ended after
  rank.py   one rank's process: its own rank folder, the jobs' handlers ("module:function") called in order
The runtime knows no job: verify and generate name their handlers in the jobs they send.
"""
