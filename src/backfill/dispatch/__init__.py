"""The asyncio dispatcher: lease -> limit -> send -> record, plus each batch's lifecycle."""
