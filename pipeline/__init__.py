"""Digit Recognizer pipeline: stages that talk through files, and a handwritten CNN engine in pipeline.nn."""
