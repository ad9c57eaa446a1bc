"""The semantic cache's rules: what a paraphrase keeps and an answer-changing edit breaks."""

from __future__ import annotations

import pytest

from gateway.cache.structure import (
    conflicts,
    differing_parts,
    plain_text,
    same_question,
    structure_of,
    typed_text,
)

MCQ = "Which planet is largest?\nA. Mars\nB. Jupiter\nC. Venus\nD. Earth\nAnswer:"


@pytest.mark.parametrize(
    ("stored", "new", "rule"),
    [
        ("A train goes 60 km in 1.5 hours. Speed?", "A train goes 60 km in 2.5 hours. Speed?", "numbers"),
        ("Ann has 5 apples and Bo has 3. How many more does Ann have?",
         "Ann has 3 apples and Bo has 5. How many more does Ann have?", "numbers"),
        ("Solve x + 3 = - 14", "Solve x + 3 = 14", "numbers"),
        ("What is −14 squared plus 2?", "What is 14 squared plus 2?", "numbers"),
        ("Convert 80,000 m to km", "Convert 8,000 m to km", "numbers"),
        ("Whose number is 13812345678?", "Whose number is 13812345687?", "numbers"),  # every digit counts
        (MCQ, MCQ.replace("A. Mars\nB. Jupiter", "A. Jupiter\nB. Mars"), "options"),
        (MCQ, "Which planet is largest? A. Mars B. Saturn C. Venus D. Earth", "options"),
        ("Fix this: `x = y + 1`", "Fix this: `x = y - 1`", "code"),
        ("Why does this print nothing?\n\nfor i in range(10, 0):\n    print(i)",
         "Why does this print nothing?\n\nfor i in range(10, 0, -1):\n    print(i)", "code"),
        ("Why does this fail in PostgreSQL?\nSELECT d, COUNT(*) FROM e WHERE COUNT(*) > 5 GROUP BY d;",
         "Why does this fail in PostgreSQL?\nSELECT d, COUNT(*) AS n FROM e GROUP BY d HAVING n > 5;", "code"),
        ("Table orders(id, customer_id, created_at, total): each customer's latest order, in SQL",
         "Tables customers(id, name), orders(id, customer_id, amount, created_at): each customer's latest order, in SQL",
         "schema"),
        ("Explain what this regex matches: ^(?=.*\\d)(?=.*[A-Z]).{8,}$",
         "Explain what this regex matches: ^(?=.*\\d)(?=.*[a-z]).{8,}$", "case"),
        ("Translate 'good morning' to French", "Traduis « good morning » en français", None),
        ("东京的人口是多少？", "What is the population of Tokyo?", "script"),
    ],
)  # fmt: skip
def test_answer_changing_edits_are_refused_by_their_rule(stored: str, new: str, rule: str | None) -> None:
    found = conflicts(stored, new)
    if rule is None:
        assert "script" not in found
    else:
        assert rule in found, found
        assert rule in conflicts(new, stored)


@pytest.mark.parametrize(
    ("stored", "new"),
    [
        ("Tom buys three pens at $2 each. What does he pay?", "tom bought 3 pens, $2 apiece - total cost?"),
        ("Sara is 12 and her brother is 15. In 3 years, what is the sum of their ages?",
         "In 3 years, what will the sum of the ages be if Sara is 12 now and her brother 15?"),
        ("Total of 1,250 and 3.50?", "what's 1250 plus 3.5"),
        (MCQ, "which planet is the largest?  (A) Mars (B) Jupiter (C) Venus (D) Earth"),
        (MCQ, "Largest planet?\na) mars\nb) jupiter\nc) venus\nd) earth"),
        ("Summarize this in one sentence: the meeting moved to Friday.", "one-sentence summary pls: the meeting moved to Friday."),
        ("Give me a list:\n- 3 eggs\n- 2 cups of flour\nWhat can I bake?", "With 3 eggs and 2 cups of flour, what can I bake?"),
        ("Rewrite `print(x)` in Rust", "how would `print(x)` look in Rust?"),
        ("Why does this print nothing?\n\nfor i in range(10, 0):\n    print(i)",
         "this loop prints nothing, why??\nfor i in range(10,0):\n  print(i)"),
        ("Given this table:\nCREATE TABLE t (\n  id INT,\n  amount INT\n);\nTotal amount per id?",
         "CREATE TABLE t (\n  id INT,\n  amount INT\n);\nsql for the total amount per id"),
        ("Explain this line:\nSELECT 1;", "what does SELECT 1; do in SQL?"),  # code pasted on one side only
        ("I have orders(id, customer_id, total numeric(10, 2)). SQL for the biggest order per customer?",
         "sql: biggest order for each customer, table Orders(id,customer_id,total numeric(10, 2))"),
        ("Explain this regex: ^[A-Z]{2}\\d{4}$", "what does ^[A-Z]{2}\\d{4}$ match? explain pls"),
        ("Is C++ faster than Rust? What is DNA?", "is c++ faster than rust? what is dna?"),  # case in prose is not code
        ("orders(id, customer_id, total): the biggest order per customer in SQL?",
         "table orders with columns id, customer_id and total: SQL for each customer's biggest order"),  # one side only
    ],
)  # fmt: skip
def test_rewording_keeps_every_structure(stored: str, new: str) -> None:
    assert conflicts(stored, new) == []
    assert conflicts(new, stored) == []


def test_numbers_are_read_as_values_with_their_signs() -> None:
    assert structure_of("Add twenty-one and 4.50, then subtract 1,000").numbers == ("21", "4.5", "1000")
    assert structure_of("x = - 7 and y = -3; a 5-3 win").numbers == ("-7", "-3", "5", "3")
    assert structure_of("3,5 kg").numbers == ("3.5",)  # a decimal comma


@pytest.mark.parametrize(
    ("stored", "new"),
    [
        ("电话13812345678", "电话13812345687"),
        ("注文番号は58213です。", "注文番号は58231です。"),  # train_t8e: left to the verifier before
        ("一辆汽车每小时行驶80公里", "一辆汽车每小时行驶60公里"),
        ("내일 오후3시 회의", "내일 오후4시 회의"),  # Hangul, decomposed into jamo by the folding
        ("ขายจานละ50 บาท", "ขายจานละ60 บาท"),
    ],
)  # fmt: skip
def test_digits_written_straight_after_cjk_thai_or_hangul_are_numbers(stored: str, new: str) -> None:
    # these scripts put no space before a number: the letter before it is no part of an id
    assert "numbers" in conflicts(stored, new)
    assert "numbers" in conflicts(new, stored)
    assert "identifiers" not in conflicts(stored, new)


def test_a_cjk_paraphrase_with_the_same_numbers_and_latin_ids_keep_their_verdicts() -> None:
    assert structure_of("电话13812345678").numbers == ("13812345678",)
    assert "numbers" not in conflicts("请帮我查一下电话13812345678的归属地", "13812345678这个号码是哪里的？")
    assert conflicts("注文番号は58213です。届いていません", "注文番号58213の商品がまだ届いていません") == []
    # a digit after a Latin (or Cyrillic) letter is still part of a word: the identifiers rule's
    assert structure_of("lookup a72b1428, 23 м2").numbers == ("23",)
    assert structure_of("订单a72b1428").identifiers == ("a72b1428",)
    assert structure_of("订单a72b1428").numbers == ()


def test_a_number_only_one_prompt_has_is_not_a_number_conflict() -> None:
    # "a" written "1", "one" dropped: paraphrases do it; the other rules and the verifier judge the rest
    assert conflicts("Give me a tip for sleeping better.", "Give me 1 tip for sleeping better.") == []
    assert conflicts("Summarize the article.", "Summarize the article in 80 words.") == ["added_words"]


@pytest.mark.parametrize(
    ("stored", "new"),
    [
        ("lookup a72b1428", "lookup d7bf14ec"),  # t163: served at p 0.997
        ("CUTNOMAX 3f9a2c71", "CUTNOMAX 0b7e4d15"),
        ("Hash 840140ec", "Hash 05895cbc"),  # hex digits first
        ("Where is my order ABC-4521?", "Where is my order XYZ-4521?"),
        ("What changed in release v1.2.3?", "What changed in release v1.3.0?"),
        ("Status of job 550e8400-e29b-41d4-a716-446655440000?", "Status of job 6fa459ea-ee8a-3ca4-894e-db77e160355e?"),
        ("What is the hybridization of the central atom in SF4?", "What is the hybridization of the central atom in SF6?"),
        ("In C4 plants, which enzyme fixes CO2 first?", "In C3 plants, which enzyme fixes CO2 first?"),
        ("What is the order of (2, 2) in Z_6 × Z_8?", "What is the order of (2, 2) in Z_6 × Z_16?"),
        ("What does error 0x1F mean?", "What does error 0x2F mean?"),
    ],
)  # fmt: skip
def test_an_identifier_replaced_by_another_is_refused(stored: str, new: str) -> None:
    # digits after a letter are no number to the numbers rule, and an id is no name: the
    # verifier read the shared words and served another id's answer
    assert "identifiers" in conflicts(stored, new)
    assert "identifiers" in conflicts(new, stored)


@pytest.mark.parametrize(
    ("stored", "new"),
    [
        ("What is the status of order ID٥٨٢١٣?", "What is the status of order ID٥٨٢٣١?"),  # t169
        ("Explain the error code E५८२१३ on my washing machine.", "Explain the error code E५८२३१ on my washing machine."),
        ("What is the status of order ID５８２１３?", "What is the status of order ID５８２３１?"),  # NFKC folds these
        ("Каков статус заказа номер58213?", "Каков статус заказа номер58231?"),
        ("Каков статус заказа номер٥٨٢١٣?", "Каков статус заказа номер٥٨٢٣١?"),
        ("Ελέγξτε την παραγγελία αρ58213", "Ελέγξτε την παραγγελία αρ58231"),
        ("Lookup ticket Ω58213 please", "Lookup ticket Ω58231 please"),
        ("ما حالة الطلب رقم٥٨٢١٣؟", "ما حالة الطلب رقم٥٨٢٣١؟"),
    ],
)  # fmt: skip
def test_an_identifier_in_another_script_replaced_by_another_is_refused(stored: str, new: str) -> None:
    # t169: the rules read only ASCII ids, and only the verifier's close bar (p up to 0.994) refused these
    assert "identifiers" in conflicts(stored, new)
    assert "identifiers" in conflicts(new, stored)


def test_the_same_identifier_with_digits_of_another_script_is_one_id() -> None:
    assert structure_of("order ID٥٨٢١٣").identifiers == structure_of("order ID58213").identifiers == ("id58213",)
    assert conflicts("What is the status of order ID٥٨٢١٣?", "What is the status of order ID58213?") == []
    assert "identifiers" not in conflicts("Каков статус заказа номер٥٨٢١٣?", "Каков статус заказа номер58213?")
    # a letter of a script written without spaces is no part of an id (the numbers rule reads the digits)
    assert structure_of("请问订单58213的状态").identifiers == ()


@pytest.mark.parametrize(
    ("stored", "new"),
    [
        ("lookup a72b1428", "please look up a72b1428"),
        ("Where is my order ABC-4521?", "where's order abc4521"),  # case and separators aside
        ("What changed in GPT-4?", "what changed in gpt4"),
        ("In L1-regularized linear regression, what does a larger lambda do?", "lasso (L1) regression: larger lambda?"),
        ("What were the main causes of World War I?", "main causes of WW1?"),  # on one side only
        ("How many moles of oxygen burn 2 moles of methane?", "moles of O2 to burn 2 mol of CH4?"),
        ("Find files larger than 100 MB in a 12-page list", "find files over 100MB in a 12 page list"),  # quantities
        ("Solve for x: 3x + 7 = 2x - 5", "solve 3x+7=2x-5 for x"),
    ],
)  # fmt: skip
def test_the_same_identifier_retyped_or_on_one_side_only_is_no_identifiers_conflict(stored: str, new: str) -> None:
    assert "identifiers" not in conflicts(stored, new)
    assert "identifiers" not in conflicts(new, stored)


def test_identifiers_are_read_with_a_digit_after_a_letter_case_and_joins_aside() -> None:
    text = "Ship ABC-4521, a72b1428, 840140ec and a 3x3 grid (v1.2.3, Z_8, L1-regularized) by 5pm: 12-page, 100MB, 3x faster"
    assert structure_of(text).identifiers == ("3x3", "840140ec", "a72b1428", "abc4521", "l1", "v1.2.3", "z8")


@pytest.mark.parametrize(
    ("stored", "new", "rule"),
    [
        ("Convert this string to an integer in Python", "Convert this integer to a string in Python", "direction"),
        ("Sort from least to greatest: 5, 2, 9", "Sort from greatest to least: 5, 2, 9", "direction"),
        ("hello llamaindex complete chat", "hello llamaindex chat", "added_words"),
        ("Generate non-random test IDs", "Generate random test IDs", "added_words"),
        ("Count the orders", "Count the orders excluding cancelled ones", "added_words"),
        ("Write this in Python: read a CSV", "Write this in Rust: read a CSV", "language"),
        ("Translate 'thank you' into French", "Translate 'thank you' into German", "language"),
        ("Who wrote 'Dune'?", "When was 'Dune' written?", "question"),
        ("Where did the Wright brothers first fly?", "Why did the Wright brothers first fly?", "question"),
        ("When should I plant tulip bulbs?", "How deep should I plant tulip bulbs?", "question"),
        ("Wanneer moet ik tulpenbollen planten?", "Hoe diep moet ik tulpenbollen planten?", "question"),
        ("Wann wurde der Kölner Dom gebaut?", "Warum wurde der Kölner Dom gebaut?", "question"),
        ("Где купить билеты в Эрмитаж?", "Когда купить билеты в Эрмитаж?", "question"),
        ("Dlaczego niebo jest niebieskie?", "Jak niebo jest niebieskie?", "question"),
        ("Quand faut-il tailler les rosiers ?", "Comment faut-il tailler les rosiers ?", "question"),
    ],
)
def test_reversed_added_and_swapped_language_words_are_refused(stored: str, new: str, rule: str) -> None:
    assert rule in conflicts(stored, new)
    assert rule in conflicts(new, stored)


@pytest.mark.parametrize(
    ("stored", "new"),
    [
        ("Explain photosynthesis in one sentence.", "hey, quick question: explain photosynthesis in one sentence pls"),
        ("What is the capital of Australia?", "capital of australia"),  # a keyword query drops the frame
        ("How do I tie a tie?", "tie a tie"),
        ("Translate this German text to English: Guten Morgen", "to English please: Guten Morgen"),
        ("Who wrote 'Dune'?", "'Dune' was written by whom?"),
        ("Why is the sky blue?", "how come the sky is blue and not some other color"),
        ("Who painted the Sistine Chapel ceiling?", "Which artist painted the Sistine Chapel ceiling?"),
        ("¿Cuándo florecen los cerezos en Japón?", "¿Qué mes florecen los cerezos en Japón?"),
        ("When did the Berlin Wall fall?", "What year did the Berlin Wall fall?"),
        (
            "What's heavier, a kilo of feathers or a kilo of iron?",
            "Which is heavier: a kilo of iron or a kilo of feathers?",
        ),
    ],
)
def test_filler_words_dropped_languages_and_reordered_alternatives_pass(stored: str, new: str) -> None:
    assert conflicts(stored, new) == []


@pytest.mark.parametrize(
    ("stored", "new"),
    [
        # t135: served at p 0.993 with the cache on (a shared suffix swayed the verifier)
        ("What is the capital of France? (order 7731)", "Which city is the capital of Germany? order 7731"),
        ("What is the capital of France? (ref 4f9dc3)", "Which city is the capital of Germany? ref 4f9dc3"),
        ("Who wrote Hamlet? (ticket 88)", "Which author wrote Macbeth? ticket 88"),
        ("Give me a 3-day itinerary for Lisbon.", "Give me a 3-day itinerary for Porto."),
        ("A poem about autumn in the style of Emily Dickinson", "A poem about autumn in the style of Walt Whitman"),
        ("How many hours ahead of New York is London?", "How many hours ahead of New York is Tokyo?"),
        ("Кто написал роман «Мастер и Маргарита»?", "Кто написал роман «Доктор Живаго»?"),
    ],
)
def test_a_name_replaced_by_another_is_refused(stored: str, new: str) -> None:
    assert "names" in conflicts(stored, new)
    assert "names" in conflicts(new, stored)


@pytest.mark.parametrize(
    ("stored", "new"),
    [
        ("what is python", "What is Python?"),  # case only
        ("Tell me about Turkey.", "tell me about turkey"),
        ("Who painted the Mona Lisa?", "Mona Lisa: who painted it?"),  # a sentence's first word
        ("Which river is the longest in Africa?", "Of these African rivers, which is the longest?"),
        ("In PostgreSQL, how do I get the current timestamp?", "What's the Postgres function for the current time?"),
        ("Who was the first President of the United States?", "1st president of the USA?"),  # acronyms aside
        ("In JavaScript, how do I remove duplicates from an array?", "How do I dedupe an array in JS?"),
        ("What is the tallest mountain?", "What is the tallest mountain in Europe?"),  # one side names none
        ("¿Cuántas calorías tiene un plátano mediano?", "¿Qué aporte calórico tiene un plátano de tamaño mediano?"),
        # German writes every noun with a capital
        ("Wie lange ist ein Reisepass in Deutschland für Erwachsene gültig?",
         "Für wie viele Jahre gilt ein deutscher Reisepass bei Erwachsenen?"),
        ("东京的人口是多少？", "东京有多少人口？"),  # no case
    ],
)  # fmt: skip
def test_names_recased_inflected_abbreviated_or_on_one_side_only_are_no_names_conflict(stored: str, new: str) -> None:
    assert "names" not in conflicts(stored, new)
    assert "names" not in conflicts(new, stored)


def test_typed_text_keeps_case_and_marks_which_may_be_the_question() -> None:
    assert typed_text("  What's  six times seven?") == typed_text("What is 6 times 7")
    assert typed_text("What does git branch -d do?") != typed_text("What does git branch -D do?")
    assert typed_text("バスの乗り方") != typed_text("パスの乗り方")
    assert typed_text("schon") != typed_text("schön")
    assert typed_text("caf\u00e9") == typed_text("cafe\u0301")  # one letter, two encodings


def test_same_question_allows_case_only_where_no_rule_says_it_is_meaning() -> None:
    assert same_question("How do vaccines work?", "how do vaccines work")
    assert not same_question("What does git branch -d do?", "What does git branch -D do?")
    assert not same_question("How many Mb are in 1 GB?", "How many MB are in 1 GB?")
    assert not same_question("Is 'ABC'.isupper() true?", "Is 'abc'.isupper() true?")
    assert not same_question("What does avó mean?", "What does avo mean?")
    # looked at where each recased word stands: the other spelling elsewhere in the prompt
    # hid these from the rules (an outside tester was served 4 of 5 at p 1.0)
    assert not same_question("Is 500 MB enough at 100 Mb/s?", "Is 500 Mb enough at 100 Mb/s?")
    assert not same_question("How is grep -I unlike grep -i?", "How is grep -i unlike grep -i?")
    assert not same_question("Is a 5 mW laser as bright as 5 MW?", "Is a 5 MW laser as bright as 5 MW?")
    assert not same_question("Convert 3 Mg to grams, not 3 mg.", "Convert 3 mg to grams, not 3 mg.")
    assert same_question("Give me a short history of China.", "give me a short history of china")


@pytest.mark.parametrize(
    ("stored", "new"),
    [
        ("Tell me about Turkey.", "Tell me about turkey."),
        ("What is Mercury made of?", "What is mercury made of?"),
        ("How do I say Polish in French?", "How do I say polish in French?"),
        ("Explain this shell command: cd ..", "Explain this shell command: cd"),
        ("What does this command do: git add .", "What does this command do: git add"),
        ("Explain sudo !!", "Explain sudo"),
        ("Explain the regex ^a.", "Explain the regex ^a"),
        ("What does this regex match: `a  b`", "What does this regex match: `a b`"),
        ("Is this valid Python: if x: print(1)", "Is this valid Python:\nif x:\nprint(1)"),
        ("Is this Makefile right?\n```\nall:\n\tgcc -o app main.c\n```", "Is this Makefile right?\n```\nall:\n    gcc -o app main.c\n```"),
        ("Why is this Markdown one paragraph?\nfirst line\nsecond line", "Why is this Markdown one paragraph?\nfirst line\n\nsecond line"),
    ],
)  # fmt: skip
def test_what_looks_like_retyping_but_changes_the_question_goes_to_the_verifier(stored: str, new: str) -> None:
    """t87: served at p_same 1.0 without a verdict (the verifier never read them)."""
    assert not same_question(stored, new)


def test_retyping_that_changes_nothing_needs_no_verdict() -> None:
    assert same_question("  What's six times seven?\n", "What is 6 times 7?")
    assert same_question("Fix this:\n  x = 1   \n  y = 2", "Fix this:\n  x = 1\n  y = 2")  # blanks ending a line
    assert same_question("Tell me about Turkey.", "tell me about turkey")  # all in lower case says nothing
    assert same_question("What is the capital of France?", "What is the capital of France")
    for stored, new in [  # t90: a closing mark in a prompt about patterns, spaces within a line
        ("What does this regex match: https?", "What does this regex match: https"),
        ("regex colou?", "regex colou"),
        ("Does the glob report? match report1", "Does the glob report match report1"),
        ("How many spaces are in: `a   b`", "How many spaces are in: `a b`"),
    ]:
        assert not same_question(stored, new)


def test_plain_text_makes_only_harmless_differences_uniform() -> None:
    assert plain_text("What is six times seven?") == plain_text("what's 6 times 7")
    assert plain_text("  Où est  la GARE ?") == plain_text("ou est la gare")
    assert plain_text("What is 6 times 7?") != plain_text("What is 6 times 8?")
    assert plain_text("Is it safe?") != plain_text("It is safe.")


@pytest.mark.parametrize(
    ("stored", "new"),
    [
        ("Напиши короткое поздравление для коллеги с выходом на пенсию.", "Как правильно варить гречку на плите?"),
        (
            "임산부는 커피를 하루에 몇 잔까지 마셔도 괜찮나요?",
            "Pythonでリストの要素を逆順に並べ替える方法を教えてください。",
        ),
        ("क्या डायबिटीज़ के मरीज़ आम खा सकते हैं?", "ताजमहल किसने बनवाया था?"),
        (  # they share only the hiragana of a polite ending ("でしょうか")
            "次の文を英語に翻訳してください：「来週の会議の資料を金曜日までにお送りいただけますでしょうか。」",
            "昨日から風邪気味なんですが、今夜お風呂に入っても大丈夫でしょうか？",
        ),
        ("How do I reverse a list in Python?", "What is the capital of Australia?"),
    ],
)
def test_prompts_that_share_almost_no_text_are_unrelated(stored: str, new: str) -> None:
    assert "unrelated" in conflicts(stored, new)
    assert "unrelated" in conflicts(new, stored)


@pytest.mark.parametrize(
    ("stored", "new"),
    [
        ("JavaScriptで配列の重複を削除する方法を教えてください。", "js 配列 重複削除 やり方"),
        ("東京で桜が一番きれいな時期はいつですか？", "東京の桜の見頃っていつ？"),
        ("Как правильно варить гречку на плите?", "как сварить гречку в кастрюле на плите"),
        (
            "How do I list all running Docker containers?",
            "Which Docker command displays every container that is up right now?",
        ),
    ],
)
def test_rewordings_share_enough_text(stored: str, new: str) -> None:
    assert "unrelated" not in conflicts(stored, new)


STORY = "Jenna earns $22 per hour. Overtime is paid at 1.5 times that rate. Last week she worked 46 hours."


@pytest.mark.parametrize(
    ("stored", "new", "parts"),
    [
        (  # the same word problem, another question: only the questions are read
            STORY + " How much did she earn last week?",
            STORY + " How much of her pay came from overtime?",
            ("How much did she earn last week?", "How much of her pay came from overtime?"),
        ),
        (  # the same options, another stem: only the stems are read
            "Which planet is largest?\nA. Mars\nB. Jupiter\nC. Venus\nD. Earth",
            "which planet is the biggest one?\nA. Mars\nB. Jupiter\nC. Venus\nD. Earth",
            ("Which planet is largest?", "which planet is the biggest one?"),
        ),
        (  # a shared opening and closing line around a changed middle
            "Summarize this.\nThe meeting moved to Friday.\nThanks!",
            "Summarize this.\nThe meeting moved to Monday.\nThanks!",
            ("The meeting moved to Friday.", "The meeting moved to Monday."),
        ),
        # one sentence each, or nothing shared: read whole
        ("What is 3.5 times 2?", "what is 3.5 times two?", ("What is 3.5 times 2?", "what is 3.5 times two?")),
        ("Who wrote Dune? Thanks", "When was Dune published? Thanks!", ("Who wrote Dune?", "When was Dune published?")),
        (
            "東京は寒いですか。雪は降りますか？",
            "東京は寒いですか。今日は晴れますか？",
            ("雪は降りますか？", "今日は晴れますか？"),
        ),
    ],
)
def test_the_verifier_reads_only_what_the_prompts_do_not_share(stored: str, new: str, parts: tuple[str, str]) -> None:
    assert differing_parts(stored, new) == parts


@pytest.mark.parametrize(
    ("stored", "new", "parts"),
    [
        # t135: a shared reference typed with brackets on one side only, in lower case: no rule
        # sees france / germany, and the verifier, reading the reference, took them for one
        ("capital of france? (order 7731)", "capital of germany? order 7731", ("capital of france?", "capital of germany?")),
        ("Who wrote Hamlet? (ticket 88)", "Which author wrote Macbeth? ticket 88",
         ("Who wrote Hamlet?", "Which author wrote Macbeth?")),
        ("who wrote hamlet? Ticket 88.", "which author wrote macbeth? “ticket 88”",
         ("who wrote hamlet?", "which author wrote macbeth?")),
        ("[order 7731]\ncapital of france?", "Order 7731:\ncapital of germany?", ("capital of france?", "capital of germany?")),
        # not where the marks or the case may be the question: read whole
        ("What does it print? (x*2)", "What does it output? x*2", ("What does it print? (x*2)", "What does it output? x*2")),
        ("What does it do? (-d)", "What does this do? d", ("What does it do? (-d)", "What does this do? d")),
        ("Size is 500 MB. How long to download?", "Size is 500 Mb. How long will it take?",
         ("Size is 500 MB. How long to download?", "Size is 500 Mb. How long will it take?")),
    ],
)  # fmt: skip
def test_a_sentence_both_share_but_for_brackets_quotes_punctuation_or_case_is_not_read(
    stored: str, new: str, parts: tuple[str, str]
) -> None:
    assert differing_parts(stored, new) == parts


def test_each_side_keeps_a_sentence_when_one_prompt_extends_the_other() -> None:
    assert differing_parts("One. Two.", "One. Two. Three?") == ("Two.", "Two. Three?")
    assert differing_parts("Same words here.", "Same words here.") == ("Same words here.", "Same words here.")


@pytest.mark.parametrize(
    ("unit", "size"),
    [(" ", 200_000), ("\t", 200_000), ("A. yes" + " " * 30_000 + "no\nB. ", 4)],
)
def test_the_rules_are_linear_on_long_runs_of_blanks(unit: str, size: int) -> None:
    # Two regexes backtracked quadratically on blanks: 60 KB held the event loop 13 s, 100 KB
    # 40 s. Linear, this takes well under a second; the bound is only there to catch a relapse.
    import time

    text = "Which one? " + unit * size
    started = time.perf_counter()
    conflicts(text + " A", text + " B")
    differing_parts(text + " A", text + " B")
    differing_parts("A? " + "(" * size + "x" + ")" * size, "B? " + "x" + " " * size)
    assert time.perf_counter() - started < 10


@pytest.mark.parametrize(
    ("stored", "new", "rule"),
    [
        ("What does this print?\n```\nfor i in range(3):\n    total += i\n    print(total)\n```",
         "What does this print?\n```\nfor i in range(3):\n    total += i\nprint(total)\n```", "code"),
        ("What does this print?\nfor i in range(3):\n    total += i\n    print(total)",
         "What does this print?\nfor i in range(3):\n    total += i\nprint(total)", "code"),
        ("How many characters long is the string 'a  b'?", "How many characters long is the string 'a b'?", "quoted"),
        ("In Python, what does 'ABC'.isupper() return?", "In Python, what does 'abc'.isupper() return?", "quoted"),
        ("How many Mb are in 1 GB?", "How many MB are in 1 GB?", "case"),
        ("What is Co in chemistry?", "What is CO in chemistry?", "case"),
        ("Is NO a toxic gas?", "Is No a toxic gas?", "case"),
        ("What does the Spanish word 'año' mean?", "What does the Spanish word 'ano' mean?", "quoted"),
        ("Was bedeutet „schön“? Erkläre 'schön'.", "Was bedeutet „schon“? Erkläre 'schon'.", "quoted"),
        ("What is 2³ + 1?", "What is 23 + 1?", "numbers"),
        ("What is 5! + 3!", "What is 5! + 3?", "numbers"),
        ("What does git branch -d do?", "What does git branch -D do?", "case"),
        ("In Python strftime what does %m mean?", "In Python strftime what does %M mean?", "case"),
        ("What does \\d match in a regex?", "What does \\D match in a regex?", "case"),
        ("What does rsync -avP do?", "What does rsync -avp do?", "case"),
        ("How many seconds are in 5 Ms?", "How many seconds are in 5 ms?", "case"),
        ("In vim, what does the command G do?", "In vim, what does the command g do?", "case"),
        ("ベッドの選び方を教えてください", "ペットの選び方を教えてください", "marks"),
        ("てんきについて教えて", "でんきについて教えて", "marks"),
        ("ข่าววันนี้มีอะไรบ้าง", "ข้าววันนี้มีอะไรบ้าง", "marks"),
        ("Cách nấu canh cá ngon", "Cách nấu canh cà ngon", "marks"),
        ("O que significa avó?", "O que significa avô?", "marks"),
    ],
)  # fmt: skip
def test_what_the_models_cannot_see_is_refused_by_a_rule(stored: str, new: str, rule: str) -> None:
    # Case, accents, blanks and superscripts are lost on the way to the (uncased) embedding
    # and verifier; these pairs were all served with p 1.0 (an outside tester). A word typed
    # all in lower case ("hunter2" for "Hunter2") or an accent dropped outside quotes is
    # still left to the verifier: on development pairs that is how paraphrases are typed.
    assert rule in conflicts(stored, new)


@pytest.mark.parametrize(
    ("stored", "new"),
    [
        ("What is the capital of France?", "what is the capital of france"),
        ("Is SQL hard to learn?", "is sql hard to learn"),
        ("¿Cuántos minutos hay que hervir un huevo?", "cuantos minutos hay que hervir un huevo"),
        ("Setting SameSite=Strict on a cookie defends against what?", "samesite=strict on a cookie defends against?"),
        ("Why does this loop print nothing?\nfor i in range(10, 0):\n    print(i)",
         "this loop prints nothing, why?\nfor i in range(10,0):\n  print(i)"),
        ("Say 'hello' in French.", "How do I say 'hello' in French?"),
        ("How do I list files with ls -l?", "how do i list files with ls -l"),
        ("¿Cómo se dice 'thank you' en inglés?", "¿Cómo se dice 'thank you' en ingles?"),
        ("هل أستطيع السفر إلى الأردن بدون تأشيرة؟", "هل استطيع السفر الى الاردن بدون تأشيرة؟"),
        ("Quanto custa a autorização?", "Quanto custa a autorizaçao?"),
        # a writer who types all in lower case says nothing by it; option labels and initials
        ("How do I find all files larger than 100MB on Linux?", "linux: find files bigger than 100mb"),
        ("In which year did the Berlin Wall fall? A) 1987 B) 1989", "Berlin Wall came down in: a) 1987 b) 1989"),
        ("In the lac operon of E. coli, what happens without lactose?", "lac operon e coli, no lactose: what happens?"),
        ("Meu Wi-Fi cai quando ligo o micro-ondas.", "Meu Wi-Fi cai quando ligo o micro-ondas. O que faço?"),
    ],
)  # fmt: skip
def test_a_sentences_capital_a_lowercased_acronym_and_reindented_code_are_no_conflict(stored: str, new: str) -> None:
    # nor an accent, hamza or tilde one prompt drops: people type that way
    assert not {"case", "quoted", "code", "marks"} & set(conflicts(stored, new))
