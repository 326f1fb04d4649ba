"""The engine core: sequences, pages, sessions, scheduler, block walk, runner and the engine loop."""
