"""Run by tests/eval_tools/test_autobatcher.py in autobatcher's own venv: autobatcher's default (flex) client asks
for chat completions and responses concurrently; prints the answers' texts as one JSON list, in question order.

Usage: python autobatcher_flex.py BASE_URL MODEL N
"""

import asyncio
import json
import sys

from autobatcher import BatchOpenAI


async def ask(client: BatchOpenAI, model: str, index: int) -> str:
    question = f"Question number {index} please"
    if index % 2:  # both paths autobatcher routes through background flex responses
        response = await client.responses.create(model=model, input=question)
        return response.output_text
    answer = await client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}])
    return answer.choices[0].message.content or ""


async def main(base_url: str, model: str, count: int) -> None:
    client = BatchOpenAI(api_key="open-mode", base_url=base_url, poll_interval_seconds=0.1, max_retries=0)
    try:
        answers = await asyncio.gather(*(ask(client, model, index) for index in range(count)))
    finally:
        await client.close()
    print(json.dumps(answers))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
