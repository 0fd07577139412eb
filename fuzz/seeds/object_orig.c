/* Seed objects for the object_diff fuzz target: one function changes,
 * one string literal and one static are used by it. */
extern int printk(const char *fmt, ...);
static int counter;

int changed(int x)
{
	counter += x;
	return printk("value %d\n", x + counter);
}

int same(int y)
{
	return y * 3;
}
