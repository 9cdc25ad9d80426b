"""A local stand-in for Exchange Online: identity platform, SMTP submission and Graph.

Built from the reference facts (reply texts included) so every test, the benchmark, `relay demo`
and users' own trials (`relay emulator`) can run without a tenant.
"""
