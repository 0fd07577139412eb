/* The patched side of object_orig.c: changed() differs, a function is new. */
extern int printk(const char *fmt, ...);
static int counter;

int added(int z)
{
	return z - 1;
}

int changed(int x)
{
	counter += 2 * x;
	return printk("value now %d\n", x + counter + added(x));
}

int same(int y)
{
	return y * 3;
}
