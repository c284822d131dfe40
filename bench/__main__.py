from bench.run import main

# Guarded: the in-process contenders run in spawned processes, which import this module again.
if __name__ == "__main__":
    raise SystemExit(main())
