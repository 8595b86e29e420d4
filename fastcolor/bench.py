"""Entry point only: ``python -m fastcolor.bench`` (the GPU device script) runs :func:`fastcolor.app.bench.main`."""
if __name__ == "__main__":
    from fastcolor.app.bench import main
    raise SystemExit(main())
