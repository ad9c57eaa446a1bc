"""Two prompts the router must tell apart, shared by the classifier's tests and the wheel check."""

HARD = (
    "Janet's ducks lay 16 eggs per day. She eats three for breakfast every morning and bakes muffins "
    "for her friends every day with four. She sells the remainder at the farmers' market daily for $2 "
    "per fresh duck egg. Each week she also buys 3 bags of feed at $7.50 each and pays a 15% fee on her "
    "sales to the market. How much profit in dollars does she make in a 4-week month?"
)
EASY = "What is the capital of France?\nA. Paris\nB. London\nC. Rome\nD. Berlin\nAnswer:"
