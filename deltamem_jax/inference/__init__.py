"""Running a trained model: generation, chat sessions with memory, session snapshots."""
